"""The protocol edge: gRPC services, REST, codecs, auth, the one RPC path (request id, metrics, status mapping,
access log) and the malformed-message guard. Imports the engine, never the other way round."""
