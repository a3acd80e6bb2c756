"""Command line (click). Only calls the service layer."""
