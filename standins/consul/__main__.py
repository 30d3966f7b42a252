"""``python -m standins.consul --port 8500``: run the stand-in until interrupted."""

from standins.consul.standin import main

raise SystemExit(main())
