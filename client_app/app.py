"""ClientApp: answers the server's node-info query and trains the subnet it is sent
(twist_fl.client). Node config keys: partition-id, num-partitions, twist-mode (true | masked),
num-threads."""

from twist_fl.client import make_client_app

app = make_client_app()
