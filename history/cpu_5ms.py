# CPU-heavy scenario: about 5 ms of pure-Python arithmetic on this machine.
__return_data = str(sum(i * i for i in range(130000)))
