# Indexing script: run by the storage node for every indexed write (srw write KEY --index),
# with the key's id (so the per-id lock orders it with other execs of the key) and the
# value as the request data.  Whatever it leaves in __return_data is the text the node
# indexes for the key; nothing means "do not index".  Replace it to index otherwise
# (strip markup, pick fields of a JSON document, ...): only the storage node writes the
# index, so a script decides what is indexed, never where.
value = __input_binary_data_tuple[0]
text = ""
if b"\0" not in value:  # binary content is skipped, not indexed as garbage
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
__return_data = text
