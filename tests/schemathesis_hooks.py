"""schemathesis hooks for the contract run (schemathesis.toml names this module).

The run never revokes the API key it runs with. `DELETE /keys/{prefix}` is a route of the
contract, and the fuzzer finds the key's own prefix in `GET /keys`; revoked, the key would
make every later request a 401 that tests nothing. That one request revokes a spare key of
the team instead (the test creates it; revoking it again changes nothing), so it still
answers as a revocation does; every key the run creates (`POST /keys`) is revoked as asked.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

from tuneq.teams.service import key_prefix

RUN_KEY_ENV = "TUNEQ_API_KEY"  # the key the run sends (`tuneq up` prints it so)
SPARE_PREFIX_ENV = "TUNEQ_SPARE_KEY_PREFIX"  # tests/test_openapi_contract.py creates it


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    key, spare = os.environ.get(RUN_KEY_ENV), os.environ.get(SPARE_PREFIX_ENV)
    if not (key and spare) or case.operation.label != "DELETE /keys/{prefix}":
        return
    if case.path_parameters.get("prefix") == key_prefix(key):
        case.path_parameters["prefix"] = spare
