"""``python -m vision_client``: the ``vision-client`` command line."""

from vision_client.cli import main

raise SystemExit(main())
