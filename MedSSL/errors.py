"""The one exception type the CLI turns into a one-line reason and a non-zero exit."""


class MedSSLError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The message names the input (a path, an option) and what is wrong with it. The CLI prints
    ``medssl: error: <message>`` on stderr and exits with status 2, without a traceback.
    """
