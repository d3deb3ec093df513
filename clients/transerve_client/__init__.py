"""transerve-client: the light Python client for transerve (grpcio, protobuf, numpy — never torch).

``TranserveClient`` / ``AsyncTranserveClient`` for the SDK, ``transerve-client`` on the command line.
"""

from transerve_client._requests import DetailedTranslation, Prediction, SentenceScore
from transerve_client.aio import AsyncTranserveClient
from transerve_client.client import RetryPolicy, TranserveClient, TranserveError

__version__ = "0.1.0"
__all__ = ["AsyncTranserveClient", "DetailedTranslation", "Prediction", "RetryPolicy", "SentenceScore",
           "TranserveClient", "TranserveError", "__version__"]
