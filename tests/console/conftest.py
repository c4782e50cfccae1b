from tests.console.browser import browser

__all__ = ["browser"]
