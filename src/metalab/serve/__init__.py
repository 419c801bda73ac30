"""``metalab serve``: an adaptation service. Clients register tasks and classes from a
handful of examples over HTTP; the model adapts on each write and predicts with abstention.

* :mod:`~metalab.serve.service`: :class:`Service`, the service without HTTP;
* :mod:`~metalab.serve.store`: the SQLite store (tasks, classes, examples, adapted states);
* :mod:`~metalab.serve.inputs`: sentences or images, checked and batched;
* :mod:`~metalab.serve.batching`: micro-batching of concurrent predictions;
* :mod:`~metalab.serve.app`: the HTTP API (FastAPI) and the web page (``page.html``).

Needs the ``serve`` extra: ``pip install "metalab[serve]"``.
"""

from metalab.serve.service import Prediction, Service, ServiceError
from metalab.serve.store import Store, StoreError

__all__ = ["Prediction", "Service", "ServiceError", "Store", "StoreError"]
