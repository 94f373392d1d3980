"""An offline stand-in for OpenAI's image API, faithful enough for the official SDK.

    from proxy.simulator import SimulatorSettings, create_simulator_app
    app = create_simulator_app(SimulatorSettings(latency_ms=50, api_key="sk-test"))

Modules: `server` the app and its routes, `routes` the request path, `forms` body reading,
`validation` OpenAI's checks, `catalogue` the models, `tokens` the token rules,
`answers` JSON and SSE bodies, `pictures` Pillow images, `faults` the fault markers,
`billing` the record, `costs` the Costs API, `connection` hanging and resets,
`refusals` its error answers, `options` its settings, `arrivals` what reached it;
for the Responses API: `responses` its orders, `response_tokens` its token rules,
`response_answers` its bodies and events, `response_store` stored and background
responses, `response_routes` its request path; for the Files and Batch APIs: `files`
the stored files, `batch_lines` a batch's lines read and run, `batches` stored batches
and their statuses, `batch_routes` their request paths.
"""

from proxy.simulator.server import SimulatorSettings, create_simulator_app

__all__ = ["SimulatorSettings", "create_simulator_app"]
