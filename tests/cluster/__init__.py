"""The serving layer: the OpenAI API, routing, autoscaling and the CLI, through real Ray Serve and real HTTP
(the shared local Serve of tests/conftest.py's `serve_url`; each module deploys its own app)."""
