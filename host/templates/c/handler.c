// {{name}}: a wasmev handler. On `{{name}}.requested` with a name as the payload, it
// publishes "<greeting>, <name>!" on `{{name}}.done`, passing the `source` header on.
// An empty name is rejected; while config `paused` is "true" it asks for a retry.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "handler.h"

// The config value for `key` as a NUL-terminated string (caller frees), or NULL.
static char *config(const char *key) {
  handler_string_t name, value;
  handler_string_set(&name, key);
  if (!wasmev_events_config_get(&name, &value)) {
    return NULL;
  }
  char *out = malloc(value.len + 1);
  if (out != NULL) {
    memcpy(out, value.ptr, value.len);
    out[value.len] = '\0';
  }
  handler_string_free(&value);
  return out;
}

static bool greet(handler_event_t *ev, handler_handle_error_t *err) {
  char *paused = config("paused");
  bool is_paused = paused != NULL && strcmp(paused, "true") == 0;
  free(paused);
  if (is_paused) {
    err->tag = WASMEV_EVENTS_TYPES_HANDLE_ERROR_RETRY;
    err->val.retry.is_some = true;
    err->val.retry.val = 1000;
    return false;
  }
  if (ev->payload.len == 0) {
    err->tag = WASMEV_EVENTS_TYPES_HANDLE_ERROR_REJECT;
    // The host takes ownership of the reason.
    handler_string_dup(&err->val.reject, "empty name: the payload is the name to greet");
    return false;
  }
  char *greeting = config("greeting");
  char text[512];
  int len = snprintf(text, sizeof text, "%s, %.*s!", greeting != NULL ? greeting : "Hello",
                     (int)ev->payload.len, (const char *)ev->payload.ptr);
  free(greeting);
  if (len >= (int)sizeof text) {
    len = sizeof text - 1;
  }

  handler_tuple2_string_string_t source[1];
  size_t n_headers = 0;
  for (size_t i = 0; i < ev->headers.len && n_headers == 0; i++) {
    handler_tuple2_string_string_t *h = &ev->headers.ptr[i];
    if (h->f0.len == 6 && strncasecmp((const char *)h->f0.ptr, "source", 6) == 0) {
      source[n_headers++] = *h;
    }
  }
  handler_string_t subject;
  handler_string_set(&subject, "{{name}}.done");
  handler_list_u8_t payload = {(uint8_t *)text, (size_t)len};
  handler_list_tuple2_string_string_t headers = {source, n_headers};
  wasmev_events_publisher_publish_error_t publish_err;
  if (!wasmev_events_publisher_publish(&subject, &payload, &headers, &publish_err)) {
    // A refused publish (no grant, broker down): ask for the event again later.
    wasmev_events_publisher_publish_error_free(&publish_err);
    err->tag = WASMEV_EVENTS_TYPES_HANDLE_ERROR_RETRY;
    err->val.retry.is_some = false;
    return false;
  }
  char line[600];
  snprintf(line, sizeof line, "greeted %.*s", (int)ev->payload.len, (const char *)ev->payload.ptr);
  handler_string_t message;
  handler_string_set(&message, line);
  wasmev_events_log_log(WASMEV_EVENTS_TYPES_LEVEL_INFO, &message);
  return true;
}

bool exports_handler_handle(handler_event_t *ev, handler_handle_error_t *err) {
  bool ok = greet(ev, err);
  // The event is ours to free (wit-bindgen's C ownership rules for exports).
  handler_event_free(ev);
  return ok;
}
