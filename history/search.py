# Search script: Session.search runs it on every node.  The request data is JSON
# {"query": "...", "limit": N}; the reply is this node's hits as JSON, best first:
# [{"key", "score", "snippet"}], or {"error": reason} for a query the index cannot parse.
request = json.loads(__input_binary_data_tuple[0])
try:
    hits = n.search(request["query"], int(request["limit"]))
    __return_data = json.dumps(hits, ensure_ascii=False)
except ValueError as exc:  # storage.fulltext.BadQuery
    __return_data = json.dumps({"error": str(exc)}, ensure_ascii=False)
