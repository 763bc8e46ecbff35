//! audit-log: subscribes to the wildcard `user.>` and records every user event.
//!
//! It shows fan-out: the same `user.created` event reaches both this handler and
//! email-sender, and neither knows about the other. Each record is published on
//! `audit.recorded` so a downstream store can persist it.

use serde::Serialize;
use wasmev_guest::{Event, HandleError, Handler, export_handler, info, publish_json};

#[derive(Serialize)]
struct AuditRecord<'a> {
    event_id: &'a str,
    subject: &'a str,
    size: usize,
    attempt: u32,
    /// The publisher's `source` header, when it set one.
    source: Option<&'a str>,
}

struct AuditLog;

impl Handler for AuditLog {
    fn handle(event: Event) -> Result<(), HandleError> {
        let record = AuditRecord {
            event_id: &event.id,
            subject: &event.subject,
            size: event.payload.len(),
            attempt: event.attempt,
            source: event.header("source"),
        };
        publish_json("audit.recorded", &record)?;
        info!("audit: {} ({} bytes)", event.subject, event.payload.len());
        Ok(())
    }
}

export_handler!(AuditLog);
