# Says which node ran it (its SRW_NODE), so `srw exec where.py --for KEY`
# shows the owner of KEY.
import os

__return_data = os.environ.get("SRW_NODE", "?")
