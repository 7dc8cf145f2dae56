"""ClientApp: answers the server's node-info query and trains the subnet it is sent
(twist_fl.federated.client). Node config keys: partition-id, num-partitions, twist-mode (true | masked),
num-threads."""

from twist_fl.federated.client import make_client_app

app = make_client_app()
