# Returns the request data unchanged.
__return_data = __input_binary_data_tuple[0]
