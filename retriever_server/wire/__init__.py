"""The API's messages as numpy arrays, shared by servers and clients.

- `tensors`: arrays <-> `retrieval.v1.Tensor` (raw bytes, dtype, shape);
- `request`: a Search request checked field by field (`parse_search`, `Limits`, `RequestError`);
- `request_counts`: its repeated fields counted from the wire bytes, before protobuf parses it;
- `wire_scan`: the protobuf wire format read by hand (varints, a message's fields);
- `search_args`: a Search request built from a client's numpy arguments (`make_request`, `Exclude`);
- `exclusions`: every query's excluded rows, read into flat arrays (`Exclusions`, `ExclusionKey`);
- `untrusted`: strings from a caller, cut and escaped before they reach a status or a log;
- `result`: `SearchResult`, neighbours as arrays, to and from a `SearchResponse`;
- `response`: a `SearchResponse` written straight to wire bytes;
- `response_reader`: a large `SearchResponse` read straight from them, its arrays views of the bytes;
- `stub`: the Retriever stub the router and the client call through (an answer that does not read: INTERNAL).

Imports: retrieval, retriever_server.wire
"""
