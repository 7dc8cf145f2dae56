"""ServerApp: reads `[tool.flwr.app.config]` and runs TwIST (twist_fl.server.run_server)."""

from twist_fl.server import make_server_app

app = make_server_app()
