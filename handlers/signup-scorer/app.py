"""signup-scorer: a Python handler (componentize-py) that scores each new signup.

On `user.created` it computes a fraud score from the email domain and the name, and
publishes `{"id", "score", "reasons"}` on `user.scored` with the event's `source` header
passed on. Config: `blocked_domains` (comma-separated), `threshold` (0-100: at or above,
the signup is also published on `user.flagged`), `paused` ("true": ask for a retry in 5 s,
e.g. while the block list is being updated). An event that is not a user is rejected.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, log, publisher, types

DISPOSABLE = {"mailinator.com", "10minutemail.com", "guerrillamail.com", "trashmail.com"}


def info(message: str) -> None:
    log.log(types.Level.INFO, message)


def score(user: dict, blocked: set) -> tuple:
    reasons = []
    points = 0
    email = user.get("email", "")
    domain = email.rsplit("@", 1)[-1].lower() if "@" in email else ""
    if not domain:
        points += 50
        reasons.append("no email domain")
    elif domain in blocked:
        points += 80
        reasons.append(f"blocked domain {domain}")
    elif domain in DISPOSABLE:
        points += 60
        reasons.append(f"disposable domain {domain}")
    name = user.get("name", "")
    if not name.strip():
        points += 20
        reasons.append("empty name")
    elif sum(c.isdigit() for c in name) > len(name) // 2:
        points += 15
        reasons.append("name is mostly digits")
    return min(points, 100), reasons


class WitWorld(wit_world.WitWorld):
    def handle(self, ev: types.Event) -> None:
        if config.get("paused") == "true":
            raise Err(types.HandleError_Retry(5000))
        try:
            user = json.loads(ev.payload)
        except ValueError as e:
            raise Err(types.HandleError_Reject(f"payload is not JSON: {e}"))
        if not isinstance(user, dict) or not isinstance(user.get("id"), str):
            raise Err(types.HandleError_Reject("payload is not a user: it needs a string id"))

        blocked = {d.strip().lower() for d in (config.get("blocked_domains") or "").split(",") if d.strip()}
        threshold = int(config.get("threshold") or "70")
        points, reasons = score(user, blocked)
        headers = [(k, v) for (k, v) in ev.headers if k.lower() == "source"]
        body = json.dumps({"id": user["id"], "score": points, "reasons": reasons}).encode()
        publisher.publish("user.scored", body, headers)
        if points >= threshold:
            publisher.publish("user.flagged", body, headers)
            log.log(types.Level.WARN, f"signup {user['id']} flagged: score {points} ({', '.join(reasons)})")
        else:
            info(f"signup {user['id']} scored {points}")
