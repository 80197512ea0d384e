"""Mount-time checks, as mountpoint-s3 and gcsfuse make them: a mount that cannot work fails at once.

Three checks, each recorded in the status (`checks: {endpoint, token, source}`):

- endpoint: the Hub answers at all (any HTTP answer to `GET /api/whoami-v2`);
- token: absent (anonymous), or one the Hub accepts (whoami answers 200; 401/403 fail the mount);
- source: the bucket, or each `--repo`, exists and is readable (made by the daemon while it builds the
  view: the same requests resolve what the view needs, nothing is asked twice).

A definite answer (401, 403, 404) fails the mount with one line and its exit code (`RemoteAccessDenied`:
5, `RemoteNotFound`: 4). A transient one (timeout, connection refused, 5xx after the retries) is only a
warning: the mount comes up, the warning is logged and shown by `mountctl status`, and reads try the Hub
again, so a Hub blip never fails a Slurm prolog and drains a node. `--no-check` skips all three (offline
starts); with `HF_HUB_OFFLINE=1` in its environment the daemon sends nothing at all.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from .errors import RemoteAccessDenied, RemoteNotFound, RemoteUnavailable
from .remote.http import HubHttp

logger = logging.getLogger(__name__)

OK = "ok"
NOT_CHECKED = "not checked"
WARNING = "warning: "


@dataclass
class MountChecks:
    """What each check found: "ok", "absent" (token), "warning: ...", or why it was not made."""

    endpoint: str = NOT_CHECKED
    token: str = NOT_CHECKED
    source: str = NOT_CHECKED

    @classmethod
    def skipped(cls, why: str) -> MountChecks:
        return cls(why, why, why)

    def warn(self, check: str, message: str) -> None:
        """Record (and log) a transient failure of `check`: the mount comes up anyway."""
        logger.warning("mount-time check of the %s: %s; mounting anyway, reads will ask the Hub again", check, message)
        setattr(self, check, WARNING + message)

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def check_endpoint_and_token(http: HubHttp) -> MountChecks:
    """Ask the Hub who the mount's token belongs to (`GET /api/whoami-v2`, the mount's short deadline).

    Raises `RemoteAccessDenied` if the Hub refuses the token; an endpoint that does not answer in time
    (or fails) leaves the source unchecked as well: its requests would only wait the same way.
    """
    checks = MountChecks()
    try:
        http.request("GET", "api/whoami-v2", what=f"{http.endpoint}/api/whoami-v2").close()
    except RemoteAccessDenied as exc:  # 401/403
        if http.has_token:
            raise RemoteAccessDenied(
                f"the Hub at {http.endpoint} refuses this mount's token (--token-file, --token or HF_TOKEN at "
                f"mount time): {exc}"
            ) from None
        checks.endpoint, checks.token = OK, "absent"  # anonymous: the Hub's 401 is its answer to no token
    except RemoteNotFound:  # a mirror or proxy without the route: it answers, the token cannot be verified
        checks.endpoint = OK
        checks.token = "not verifiable (no whoami route at this endpoint)" if http.has_token else "absent"
    except RemoteUnavailable as exc:
        checks.warn("endpoint", f"{http.endpoint} unreachable or failing ({exc})")
        checks.token = checks.source = "not checked: the endpoint did not answer"
    else:
        checks.endpoint, checks.token = OK, OK if http.has_token else "absent"
    return checks
