"""The node agent: applies its node's AmbientNodeConfig in the kernel and talks ZDS to ztunnel."""
