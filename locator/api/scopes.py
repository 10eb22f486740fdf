"""SMART on FHIR scopes: does a granted scope allow a read or a search of a resource type?

SMART App Launch 2.2.0, "Scopes for requesting FHIR resources":
- form `<context>/<resource>.<permissions>`, context `patient` | `user` | `system`,
  resource a type or `*` (all types);
- v1 permissions: `read`, `write`, `*` (`read` and `*` allow read and search);
- v2 permissions: a non-empty subset of `cruds`, letters in that order (`c` create, `r` read,
  `u` update, `d` delete, `s` search); `r` is needed to read by id, `s` to search;
  `.rs` allows both. `*` is not a v2 permission.
- v2 scopes may carry a query (`user/Observation.rs?category=laboratory`): a constrained
  scope; the locator grants nothing from one (it cannot prove the constraint holds).
`patient/` scopes need a patient launch context, which a national index never has: callers
use `user/` or `system/` scopes (interface.md, Security).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

Interaction = Literal["read", "search", "create", "update", "delete"]

_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]+)\."
    r"(?P<permissions>[a-z*]+)$"
)
_V2_PERMISSIONS = re.compile(r"^c?r?u?d?s?$")
V1_READ = frozenset({"read", "*"})
V1_WRITE = frozenset({"write", "*"})
READING = frozenset({"read", "search"})
V2_LETTER = {"read": "r", "search": "s", "create": "c", "update": "u", "delete": "d"}


def permits(permissions: str, interaction: Interaction) -> bool:
    """True when a permission string (v1 or v2) allows the interaction: v1 `read` allows
    read and search, `write` create, update and delete, `*` all of them."""
    if permissions in V1_READ | V1_WRITE:
        return permissions in (V1_READ if interaction in READING else V1_WRITE)
    if not _V2_PERMISSIONS.match(permissions):
        return False
    return V2_LETTER[interaction] in permissions


def allows(
    granted: Iterable[str],
    *,
    resource: str,
    interaction: Interaction,
    contexts: tuple[str, ...] = ("user", "system"),
) -> bool:
    """True when any granted scope allows `interaction` on `resource` in one of `contexts`."""
    for scope in granted:
        match = _SCOPE.match(scope)
        if match is None or match["context"] not in contexts:
            continue
        if match["resource"] not in ("*", resource):
            continue
        if permits(match["permissions"], interaction):
            return True
    return False


def supported_scopes() -> list[str]:
    """The scopes the locator understands, for smart-configuration's `scopes_supported`."""
    return [
        "user/ImagingStudy.read",
        "user/ImagingStudy.rs",
        "system/ImagingStudy.read",
        "system/ImagingStudy.rs",
        "system/AuditEvent.read",
        "system/AuditEvent.rs",
        "system/Subscription.read",
        "system/Subscription.write",
        "system/Subscription.rs",
        "system/Subscription.cruds",
    ]
