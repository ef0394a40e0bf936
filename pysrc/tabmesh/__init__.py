"""tabmesh: a browser tab as a node of a private AI mesh.

Modules that touch the browser (`js`) live in thin adapters (jsbridge, page, gpu.browser,
mesh.rtc); everything else imports under plain CPython and is tested natively.
"""

__version__ = "0.1.0"
