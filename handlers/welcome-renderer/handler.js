// welcome-renderer: a JavaScript handler (componentize-js) that renders the in-app
// welcome message for each new user.
//
// On `user.created` it fills the config `template` ("Welcome, {name}!") in the language
// the `locale` header asks for (a `template_<lang>` config key, e.g. `template_de`), and
// publishes `{"id", "locale", "text"}` on `notify.welcome`, passing the `source` header on.
// Config `paused = "true"` asks for a retry in 2 s; an event that is not a user with a
// name is rejected.
import { publish } from 'wasmev:events/publisher@0.1.0';
import { log } from 'wasmev:events/log@0.1.0';
import { get } from 'wasmev:events/config@0.1.0';

const decoder = new TextDecoder();
const encoder = new TextEncoder();

// The WIT `handle-error` variant; thrown from `handle`, it becomes the `err` result.
const retry = (ms) => ({ tag: 'retry', val: ms });
const reject = (reason) => ({ tag: 'reject', val: reason });

function header(ev, name) {
  const found = ev.headers.find(([k]) => k.toLowerCase() === name);
  return found ? found[1] : undefined;
}

function render(template, user) {
  return template.replace(/\{(\w+)\}/g, (whole, key) => (key in user ? String(user[key]) : whole));
}

export function handle(ev) {
  if (get('paused') === 'true') {
    throw retry(2000);
  }
  let user;
  try {
    user = JSON.parse(decoder.decode(ev.payload));
  } catch (e) {
    throw reject(`payload is not JSON: ${e.message}`);
  }
  if (typeof user !== 'object' || user === null || typeof user.id !== 'string' || !user.name) {
    throw reject('payload is not a user: it needs a string id and a name');
  }
  const locale = (header(ev, 'locale') || 'en').slice(0, 2).toLowerCase();
  const template = get(`template_${locale}`) ?? get('template') ?? 'Welcome, {name}!';
  const text = render(template, user);
  const source = header(ev, 'source');
  const headers = source === undefined ? [] : [['source', source]];
  const body = encoder.encode(JSON.stringify({ id: user.id, locale, text }));
  try {
    publish('notify.welcome', body, headers);
  } catch (e) {
    // A refused publish (e.g. the broker is unavailable) arrives as a thrown error whose
    // payload is the WIT `publish-error`: ask for the event again later.
    log('warn', `could not publish the welcome for ${user.id}: ${JSON.stringify(e.payload ?? e)}`);
    throw retry(undefined);
  }
  log('info', `welcome for ${user.id} rendered (${locale})`);
}
