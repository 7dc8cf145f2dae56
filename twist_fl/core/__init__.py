"""The method, with no Flower, Ray, subprocess or network import: configuration, blueprints,
tensor layouts (`blocks`), the model, data, local training, the wire format and file writes."""
