"""The ReplicationError tree. Imports nothing of ours.

Callers catch the narrowest class they can act on; the CLI maps every class to one clear line and an
exit code, never a traceback.
"""

from __future__ import annotations


class ReplicationError(Exception):
    """Base of every error standby raises on purpose."""


class ConfigError(ReplicationError):
    """A config file or option is wrong. The message names the key path."""


class PathRejected(ReplicationError):
    """A relative path breaks the path rules (traversal, absolute, a name Windows cannot hold...)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"path {path!r} refused: {reason}")
        self.path = path
        self.reason = reason


class FrameError(ReplicationError):
    """Bytes that do not decode as a frame: bad length, bad checksum, not msgpack."""


class ProtocolError(ReplicationError):
    """The protocol was broken."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids in the current state (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids (bad or hostile peer)."""


class PeerSilent(ConnectionError):
    """No whole frame came from the peer for the silence timeout: a dead host, a cut or a stalled proxy.
    A ConnectionError: the link drops and reconnects, like any other broken connection."""


class PeerRefused(ReplicationError):
    """The peer refused us at the handshake (version, epoch fence, busy...)."""


class EpochFenced(PeerRefused):
    """A sender with an epoch lower than the highest the receiver has seen was refused."""


class SafetyHalt(ReplicationError):
    """Replication stopped rather than propagate a probable wipe; an operator must confirm."""


class JournalError(ReplicationError):
    """The journal cannot be opened or read (not a torn tail: that is cut, not raised)."""


class JournalDamaged(JournalError):
    """The journal's bytes are inconsistent at a known place: a frame that is whole but not a valid entry,
    a bad frame with a valid one after it, a seq out of order. Never cut on open: ``standby journal check``
    reports it and ``standby journal repair`` keeps the valid prefix and moves the rest aside."""

    def __init__(self, segment: str, offset: int, reason: str, hint: str = "") -> None:
        where = f"journal segment {segment} at byte {offset}: {reason}"
        super().__init__(f"{where} ({hint})" if hint else where)
        self.segment = segment
        self.offset = offset
        self.reason = reason


class JournalFull(JournalError):
    """The journal's disk is full (ENOSPC) or over quota (EDQUOT). The journal stays consistent: it holds
    exactly the entries up to ``Journal.pending``; whatever the failing call was appending is gone."""


class StateLocked(ReplicationError):
    """Another process holds the state folder (a second ``send`` or ``receive`` on the same folder)."""


class ApplyError(ReplicationError):
    """A change could not be applied to the replica."""
