# Runs in the tab under PyScript/Pyodide; everything lives in the tabmesh package.
from tabmesh.page import main

await main()  # noqa: F704 - PyScript runs this file with top-level await
