"""Suite-wide ordering: native tests first, browser tests last.

pytest-playwright's sync API keeps an asyncio loop running on the main thread once the
session browser starts, after which native tests' asyncio.run() would refuse to run. So the
browser tests go last, whatever order they were named in.
"""


def pytest_collection_modifyitems(session, config, items):
    def is_browser(item) -> bool:
        return "/tests/browser/" in str(item.fspath).replace("\\", "/")
    items.sort(key=is_browser)  # stable: keeps the order inside each group
