"""The gateway's routes by concern, as vLLM's ``entrypoints/openai/*`` routers are: the seed's endpoints
(``generate``), the OpenAI API (``openai``), alias switches (``admin``), and health and metrics (``ops``)."""
