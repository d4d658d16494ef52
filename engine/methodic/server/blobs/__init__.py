"""The blob data path: presigned PUT, GET and HEAD of component bytes on a dedicated asyncio listener."""
