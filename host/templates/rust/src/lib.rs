//! {{name}}: a wasmev handler. On `{{name}}.requested` with a name as the payload, it
//! publishes "<greeting>, <name>!" on `{{name}}.done`, passing the `source` header on.
//! An empty name is rejected; while config `paused` is "true" it asks for a retry.
{{prelude}}
wit_bindgen::generate!({ path: "wit", world: "handler" });

// The world `use`s `event` and `handle-error`, so the bindings define them at the root.
use wasmev::events::types::Level;
use wasmev::events::{config, log, publisher};

struct Component;

impl Guest for Component {
    fn handle(ev: Event) -> Result<(), HandleError> {
        if config::get("paused").as_deref() == Some("true") {
            return Err(HandleError::Retry(Some(1000)));
        }
        let name = String::from_utf8_lossy(&ev.payload).trim().to_string();
        if name.is_empty() {
            return Err(HandleError::Reject("empty name: the payload is the name to greet".into()));
        }
        let greeting = config::get("greeting").unwrap_or_else(|| "Hello".into());
        let headers: Vec<(String, String)> = ev
            .headers
            .into_iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("source"))
            .collect();
        let text = format!("{greeting}, {name}!");
        // A refused publish (no grant, broker down) is a value, not a trap: retry later.
        publisher::publish("{{name}}.done", text.as_bytes(), &headers).map_err(|e| {
            log::log(Level::Warn, &format!("publish refused: {e:?}"));
            HandleError::Retry(None)
        })?;
        log::log(Level::Info, &format!("greeted {name}"));
        Ok(())
    }
}

export!(Component);
