"""ServerApp: reads `[tool.flwr.app.config]` and runs TwIST (twist_fl.federated.server.run_server)."""

from twist_fl.federated.server import make_server_app

app = make_server_app()
