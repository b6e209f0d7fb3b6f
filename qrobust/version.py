"""qrobust's version, in a module of its own: the packages name it without importing qrobust's
package, which imports them."""
__version__ = "0.1.0"
