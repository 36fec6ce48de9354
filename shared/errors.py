"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class PflError(Exception):
    """A problem the user can fix (bad path, unknown name, malformed file).

    The CLI turns it into ``pfl: error: <message>`` and exit status 2, never a traceback.
    """


#: What a device may say when it refuses or fails a message: a code and this fixed text,
#: never the exception's message (which can quote user data: a gold label, a file line).
#: The details stay in the device's own log. Flower's own codes are 0..8.
DEVICE_ERRORS = {
    400: "bad request: the message is malformed or names something unknown",
    403: "refused by the device's consent policy",
    412: "the device is not configured for this (its node config lacks a setting)",
    500: "the device failed to handle this message (details in the device's log)",
    503: "the piece pool could not be read or had no pieces for this device",
}
BAD_REQUEST, CONSENT_DENIED, NOT_CONFIGURED, FAILED, POOL_UNAVAILABLE = 400, 403, 412, 500, 503

#: The metric a device reports, per method, for a method that failed on it
#: (``METHOD/failed`` = the code): the other methods' results stand.
FAILED_METRIC = "failed"


def device_error_reason(code: int) -> str:
    """The fixed text of a device error ``code`` (see :data:`DEVICE_ERRORS`)."""
    return f"code {code}: {DEVICE_ERRORS.get(code, DEVICE_ERRORS[FAILED])}"
