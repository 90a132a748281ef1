"""Errors that reach the user, each with a documented exit code.

The CLI turns a :class:`MaeDeployError` into ``error: <message>`` on stderr and exits with its
``exit_code``. Anything else is a bug and exits 1 with a traceback.

Exit codes (also in README.md):

====  =====================================================================
0     success
1     unexpected internal error (a bug: please report it)
2     bad command-line usage (click's own code)
3     bad input: checkpoint, bundle, image, option value or output path
4     the job finished but some inputs failed (see errors.jsonl)
5     verification failed: an exported graph disagrees with PyTorch
6     a required optional package is missing (the message says what to install)
7     the requested device or backend is not available on this machine, or a source URL / bucket cannot
      be reached
130   interrupted by Ctrl-C (SIGINT); outputs already finished are kept
====  =====================================================================
"""

from __future__ import annotations


class MaeDeployError(Exception):
    """A problem the user can fix; the message names it and says what to do."""

    exit_code = 3


class InputError(MaeDeployError):
    """Bad input: a file, a value or a path."""

    exit_code = 3


class CheckpointError(InputError):
    """A checkpoint that cannot be read, detected or matched to an architecture."""


class BundleError(InputError):
    """A bundle directory that is missing files, corrupt or of another format version."""


class PartialFailure(MaeDeployError):
    """The job ran to the end but some inputs failed."""

    exit_code = 4


class VerificationError(MaeDeployError):
    """An exported graph disagrees with the PyTorch reference beyond tolerance."""

    exit_code = 5


class MissingDependency(MaeDeployError):
    """An optional package is not installed."""

    exit_code = 6

    def __init__(self, package: str, purpose: str, install: str | None = None) -> None:
        hint = install or f"pip install {package}"
        super().__init__(f"{purpose} needs the package '{package}', which is not installed: {hint}")
        self.package = package


class DeviceUnavailable(MaeDeployError):
    """The requested device/backend does not work here (never silently replaced by another)."""

    exit_code = 7


class SourceUnreachable(MaeDeployError):
    """A source URL, bucket or host that does not answer (or refuses the credentials) at planning."""

    exit_code = 7
