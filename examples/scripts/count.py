# Counts the calls for the key named by the request data: reads its counter,
# adds one, writes it back and returns the new count.  Pushed with
# `srw scripts push examples/scripts/count.py` (README "Scripts kept in the cluster").
key = "count:" + __input_binary_data_tuple[0].decode()
try:
    count = int(n.read_data(key))
except KeyError:
    count = 0
n.write_data(key, str(count + 1).encode())
__return_data = str(count + 1)
