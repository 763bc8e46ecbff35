// audit-checksum: a C handler (wit-bindgen's C generator + clang) that seals each audit
// record with a checksum, so a store downstream can tell a record was not altered.
//
// On `audit.recorded` it computes the CRC-32 of the record (after the config `key`, so
// only holders of the key can recompute it) and publishes
// `{"event_id", "subject", "bytes", "crc32"}` on `audit.sealed`, with the checksum in an
// `Audit-Crc32` header and the event's `source` header passed on. Config: `key`,
// `max_bytes` (larger records are rejected), `paused` ("true": retry in 1 s).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "handler.h"

static handler_string_t str(const char *s) {
  handler_string_t out;
  handler_string_set(&out, s);
  return out;
}

static void log_line(wasmev_events_log_level_t level, const char *message) {
  handler_string_t text = str(message);
  wasmev_events_log_log(level, &text);
}

// The config value for `key` as a NUL-terminated string (caller frees), or NULL.
static char *config(const char *key) {
  handler_string_t name = str(key);
  handler_string_t value;
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

static uint32_t crc32_update(uint32_t crc, const uint8_t *bytes, size_t len) {
  crc = ~crc;
  for (size_t i = 0; i < len; i++) {
    crc ^= bytes[i];
    for (int bit = 0; bit < 8; bit++) {
      crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
  }
  return ~crc;
}

// Append `s` (len bytes) to `out` as a JSON string body, escaping what JSON requires.
static size_t json_escape(char *out, size_t cap, const uint8_t *s, size_t len) {
  size_t n = 0;
  for (size_t i = 0; i < len && n + 7 < cap; i++) {
    uint8_t c = s[i];
    if (c == '"' || c == '\\') {
      out[n++] = '\\';
      out[n++] = (char)c;
    } else if (c < 0x20) {
      n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
    } else {
      out[n++] = (char)c;
    }
  }
  out[n] = '\0';
  return n;
}

static bool fail_reject(handler_handle_error_t *err, const char *reason) {
  err->tag = WASMEV_EVENTS_TYPES_HANDLE_ERROR_REJECT;
  // The host takes ownership of the reason and frees it.
  handler_string_dup(&err->val.reject, reason);
  return false;
}

static bool fail_retry(handler_handle_error_t *err, bool has_delay, uint32_t ms) {
  err->tag = WASMEV_EVENTS_TYPES_HANDLE_ERROR_RETRY;
  err->val.retry.is_some = has_delay;
  err->val.retry.val = ms;
  return false;
}

static bool seal(handler_event_t *ev, handler_handle_error_t *err) {
  char *paused = config("paused");
  bool is_paused = paused != NULL && strcmp(paused, "true") == 0;
  free(paused);
  if (is_paused) {
    return fail_retry(err, true, 1000);
  }
  if (ev->payload.len == 0) {
    return fail_reject(err, "empty audit record: nothing to seal");
  }
  char *max = config("max_bytes");
  unsigned long max_bytes = max != NULL ? strtoul(max, NULL, 10) : 65536;
  free(max);
  if (ev->payload.len > max_bytes) {
    char reason[96];
    snprintf(reason, sizeof reason, "audit record of %zu bytes is over max_bytes (%lu)",
             ev->payload.len, max_bytes);
    return fail_reject(err, reason);
  }

  char *key = config("key");
  uint32_t crc = 0;
  if (key != NULL) {
    crc = crc32_update(crc, (const uint8_t *)key, strlen(key));
    free(key);
  }
  crc = crc32_update(crc, ev->payload.ptr, ev->payload.len);

  char id[256], subject[256], body[768], hex[9];
  json_escape(id, sizeof id, ev->id.ptr, ev->id.len);
  json_escape(subject, sizeof subject, ev->subject.ptr, ev->subject.len);
  snprintf(hex, sizeof hex, "%08x", crc);
  int body_len = snprintf(body, sizeof body,
                          "{\"event_id\":\"%s\",\"subject\":\"%s\",\"bytes\":%zu,\"crc32\":\"%s\"}",
                          id, subject, ev->payload.len, hex);

  // Headers: the checksum, and the event's `source` when it has one.
  handler_tuple2_string_string_t headers[2];
  size_t n_headers = 0;
  headers[n_headers].f0 = str("Audit-Crc32");
  headers[n_headers].f1 = str(hex);
  n_headers++;
  for (size_t i = 0; i < ev->headers.len; i++) {
    handler_tuple2_string_string_t *h = &ev->headers.ptr[i];
    if (h->f0.len == 6 && strncasecmp((const char *)h->f0.ptr, "source", 6) == 0) {
      headers[n_headers++] = *h;
      break;
    }
  }
  handler_string_t to = str("audit.sealed");
  handler_list_u8_t payload = {(uint8_t *)body, (size_t)body_len};
  handler_list_tuple2_string_string_t header_list = {headers, n_headers};
  wasmev_events_publisher_publish_error_t publish_err;
  if (!wasmev_events_publisher_publish(&to, &payload, &header_list, &publish_err)) {
    bool unavailable = publish_err.tag == WASMEV_EVENTS_TYPES_PUBLISH_ERROR_UNAVAILABLE;
    wasmev_events_publisher_publish_error_free(&publish_err);
    if (unavailable) {
      log_line(WASMEV_EVENTS_TYPES_LEVEL_WARN, "broker unavailable; asking for a retry");
      return fail_retry(err, false, 0);
    }
    return fail_reject(err, "audit.sealed was refused (check the publish grant)");
  }
  char line[320];
  snprintf(line, sizeof line, "sealed %s: %zu bytes, crc32 %s", id, ev->payload.len, hex);
  log_line(WASMEV_EVENTS_TYPES_LEVEL_INFO, line);
  return true;
}

bool exports_handler_handle(handler_event_t *ev, handler_handle_error_t *err) {
  bool ok = seal(ev, err);
  // The event is ours to free (wit-bindgen's C ownership rules for exports).
  handler_event_free(ev);
  return ok;
}
