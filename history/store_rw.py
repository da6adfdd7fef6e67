# Store scenario: read the key named by the request data, append a byte, write it back.
key = __input_binary_data_tuple[0].decode()
try:
    value = n.read_data(key)
except KeyError:
    value = b""
value = (value + b".")[-64:]
n.write_data(key, value)
__return_data = value
