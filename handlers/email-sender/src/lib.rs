//! email-sender: reacts to `user.created` and publishes `email.sent`.
//!
//! The user service that publishes `user.created` does not know this handler exists; this
//! handler does not know who consumes `email.sent`. Configuration (`from`, `subject`,
//! `body`) comes from the handler's `config` table in `runtime.toml`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmev_guest::{Event, HandleError, Handler, config, export_handler, info, publish_json};

#[derive(Deserialize)]
struct UserCreated {
    /// Strings and numbers are both common as ids; keep whichever the user service sends.
    id: Value,
    name: String,
    email: String,
}

#[derive(Serialize)]
struct EmailSent<'a> {
    to: &'a str,
    from: &'a str,
    subject: String,
    body: String,
    user_id: String,
}

const DEFAULT_FROM: &str = "noreply@example.com";
const DEFAULT_SUBJECT: &str = "Welcome, {name}!";
const DEFAULT_BODY: &str = "Hi {name}, your account {id} is ready.";

struct EmailSender;

impl Handler for EmailSender {
    fn handle(event: Event) -> Result<(), HandleError> {
        let user: UserCreated = event.json()?;
        let user_id = match &user.id {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !plausible_email(&user.email) {
            return Err(HandleError::Reject(format!(
                "user {user_id} has no valid email address: {:?}",
                user.email
            )));
        }
        let from = config("from").unwrap_or_else(|| DEFAULT_FROM.to_string());
        let subject_template = config("subject").unwrap_or_else(|| DEFAULT_SUBJECT.to_string());
        let body_template = config("body").unwrap_or_else(|| DEFAULT_BODY.to_string());
        let email = EmailSent {
            to: &user.email,
            from: &from,
            subject: render(&subject_template, &user.name, &user_id),
            body: render(&body_template, &user.name, &user_id),
            user_id: user_id.clone(),
        };
        publish_json("email.sent", &email)?;
        info!("welcome email for user {user_id} sent to {}", user.email);
        Ok(())
    }
}

/// Fill `{name}` and `{id}` placeholders.
fn render(template: &str, name: &str, id: &str) -> String {
    template.replace("{name}", name).replace("{id}", id)
}

/// A deliberately small check: one `@`, a non-empty local part, a dotted domain, no spaces.
/// Real deliverability is the mail provider's job.
fn plausible_email(address: &str) -> bool {
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !address.chars().any(char::is_whitespace)
}

export_handler!(EmailSender);
