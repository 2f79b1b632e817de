"""`kubectl ambient`: a kubectl plugin that reads the AmbientNodeConfigs (and the pods and
namespaces they are about) and says what is redirected, where, and why.

Pure core: `objects` parses what the API server returns; `why`, `overview` and `listing`
decide what to say; `human` says it (`-o json|yaml` dumps the same reports). The edges are
`source` (the API server, behind a Protocol) and `main` (the command line).
"""
