"""`python -m kvstore.server --model ...`: `kvstore serve` with MLX's matmuls on OpenBLAS where it is installed.

(`kvstore serve` asks for OpenBLAS too, but the kvstore command imports mlx before its subcommand runs.)
"""

import kvstore

kvstore.use_openblas()  # before anything imports mlx

import os  # noqa: E402

from kvstore.cli.commands_serve import serve  # noqa: E402
from kvstore.cli.main import StoreRef  # noqa: E402

serve.main(prog_name="python -m kvstore.server",
           obj=StoreRef(os.environ.get("KVSTORE_HOME") or str(kvstore.default_home()), os.environ.get("KVSTORE_BLOBS")))
