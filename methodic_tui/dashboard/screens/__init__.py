"""The screens: dashboard, asset details, recovery, and the modals."""
