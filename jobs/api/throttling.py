"""The start throttle: per user (or per client address in anonymous mode),
counted in the database with one conditional UPDATE (throttle.throttle_take),
so the rate holds across web processes and parallel requests. A view opts
in with `throttle_scope`; the scope's rate comes from DEFAULT_THROTTLE_RATES."""

from django.conf import settings
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from ..services import throttle


class ScopedDatabaseThrottle(BaseThrottle):
    def allow_request(self, request, view):
        scope = getattr(view, "throttle_scope", None)
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(scope) if scope else None
        if rate is None:
            return True
        self.wait_seconds = throttle.throttle_take(
            scope=scope, ident=caller_ident(request), rate=throttle.Rate.parse(rate)
        )
        return self.wait_seconds is None

    def wait(self):
        return self.wait_seconds


def caller_ident(request) -> str:
    """The signed-in user, else the client's address."""
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return f"address:{client_address(request)}"


ADDRESS_CHARS = 100  # an IPv6 address with a port and a zone takes about 60


def client_address(request) -> str:
    """The connection's address; behind STRINGSIGHT_TRUSTED_PROXIES proxies,
    the address the farthest of them saw (each proxy appends the address it
    was reached from to X-Forwarded-For, so entries to the left of those
    are whatever the client chose to send)."""
    remote = request.META.get("REMOTE_ADDR", "")
    proxies = settings.STRINGSIGHT_TRUSTED_PROXIES
    if not proxies:
        return remote
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
    # Cut to fit a throttle bucket: with more proxies set than there are,
    # the hop is the client's say, as long as a header allows.
    return hops[-proxies][:ADDRESS_CHARS] if len(hops) >= proxies else remote
