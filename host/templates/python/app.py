"""{{name}}: a wasmev handler.

On `{{name}}.requested` with a name as the payload, it publishes "<greeting>, <name>!" on
`{{name}}.done`, passing the `source` header on. An empty name is rejected; while config
`paused` is "true" it asks for a retry.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, log, publisher, types


class WitWorld(wit_world.WitWorld):
    def handle(self, ev: types.Event) -> None:
        if config.get("paused") == "true":
            raise Err(types.HandleError_Retry(1000))
        name = ev.payload.decode("utf-8", "replace").strip()
        if not name:
            raise Err(types.HandleError_Reject("empty name: the payload is the name to greet"))
        greeting = config.get("greeting") or "Hello"
        headers = [(k, v) for (k, v) in ev.headers if k.lower() == "source"]
        try:
            publisher.publish("{{name}}.done", f"{greeting}, {name}!".encode(), headers)
        except Err as e:
            # A refused publish (no grant, broker down): ask for the event again later.
            log.log(types.Level.WARN, f"publish refused: {e.value}")
            raise Err(types.HandleError_Retry(None))
        log.log(types.Level.INFO, f"greeted {name}")
