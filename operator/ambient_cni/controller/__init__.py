"""The cluster controller: decides each node's desired redirection state."""
