"""The doors to the upstream's image spend, one module each (pure).

A door answers the request path's few questions about the requests that come through
it: how a body is parsed, bounded, written out again and metered, and which events end
a stream. Everything else (identify, policy, reserve, forward, settle, observe, answer)
is the pipeline's (`proxy.web.pipeline`), written once for every door.
"""

from proxy.doors.base import AnswerMeter, Door, StreamMeter
from proxy.doors.images import ImagesDoor
from proxy.doors.responses import ResponsesDoor

__all__ = ["AnswerMeter", "Door", "ImagesDoor", "ResponsesDoor", "StreamMeter"]
