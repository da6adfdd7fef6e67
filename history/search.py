# Search script: this node's hits for a script that asks (srw search and
# Session.search send SEARCH to every node directly).  The request data is JSON
# {"query": "...", "limit": N}; the reply is this node's hits as JSON, best first:
# [{"key", "score", "snippet", "parts"}], or {"error": reason} for a query that cannot be run.
request = json.loads(__input_binary_data_tuple[0])
try:
    hits = n.search(request["query"], int(request["limit"]))
    __return_data = json.dumps(hits, ensure_ascii=False)
except ValueError as exc:  # storage.query.BadQuery
    __return_data = json.dumps({"error": str(exc)}, ensure_ascii=False)
