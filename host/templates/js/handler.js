// {{name}}: a wasmev handler. On `{{name}}.requested` with a name as the payload, it
// publishes "<greeting>, <name>!" on `{{name}}.done`, passing the `source` header on.
// An empty name is rejected; while config `paused` is "true" it asks for a retry.
import { publish } from 'wasmev:events/publisher@0.1.0';
import { log } from 'wasmev:events/log@0.1.0';
import { get } from 'wasmev:events/config@0.1.0';

export function handle(ev) {
  if (get('paused') === 'true') {
    // A thrown handle-error variant is the handler's `err` result.
    throw { tag: 'retry', val: 1000 };
  }
  const name = new TextDecoder().decode(ev.payload).trim();
  if (name === '') {
    throw { tag: 'reject', val: 'empty name: the payload is the name to greet' };
  }
  const greeting = get('greeting') ?? 'Hello';
  const headers = ev.headers.filter(([k]) => k.toLowerCase() === 'source');
  try {
    publish('{{name}}.done', new TextEncoder().encode(`${greeting}, ${name}!`), headers);
  } catch (e) {
    // A refused publish (no grant, broker down): ask for the event again later.
    log('warn', `publish refused: ${JSON.stringify(e.payload ?? String(e))}`);
    throw { tag: 'retry', val: undefined };
  }
  log('info', `greeted ${name}`);
}
