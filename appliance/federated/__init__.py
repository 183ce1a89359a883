"""Federated training between sites (Flower): certificates, keys and coordination."""
