"""``python -m lift_serve.bundle``: print the manifest's JSON Schema (docs/bundle-manifest.schema.json)."""

import json

from lift_serve.bundle.manifest import json_schema

print(json.dumps(json_schema(), indent=2))
